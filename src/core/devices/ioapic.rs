//! An 82093AA-style I/O APIC with 24 pins (MMIO at 0xFEC00000).
//!
//! The guest selects a register by writing its index to IOREGSEL (offset 0x00) and
//! accesses it through IOWIN (offset 0x10), both 32 bits wide:
//!
//! | index | register |
//! | --- | --- |
//! | 0x00 | ID (bits 27:24) |
//! | 0x01 | version: 0x11, maximum redirection entry 23 (bits 23:16) |
//! | 0x02 | arbitration ID, equal to the ID |
//! | 0x10 + 2n, 0x11 + 2n | low and high half of the redirection entry of pin n |
//!
//! Redirection entry bits: 7:0 vector, 10:8 delivery mode, 11 logical destination, 12
//! delivery status (always 0), 13 active-low polarity, 14 remote IRR (read-only), 15
//! level trigger, 16 mask, 63:56 destination.
//!
//! An edge-triggered pin sends a message on each rising edge while unmasked. A
//! level-triggered pin sends one while it is asserted, unmasked and its remote IRR is
//! clear, then sets remote IRR until the LAPIC broadcasts an EOI for the vector
//! ([`Ioapic::end_of_interrupt`]). Messages queue inside the IOAPIC until the owner
//! takes them with [`Ioapic::take_messages`] and hands them to the LAPIC.
//!
//! Version 0x11 has no EOI register, so Linux ends level-triggered interrupts through the
//! LAPIC's EOI broadcast alone. Pin levels are logical (true means asserted), so the
//! polarity bit is stored but does not invert them.

use super::lapic::{DeliveryMode, InterruptMessage};
use super::{fill_unclaimed, BusDevice, DeviceWindow, GuestErrorLog};
use crate::core::memory::IOAPIC_BASE;

/// Number of input pins.
pub const IOAPIC_PINS: u32 = 24;
/// Size of the IOAPIC's MMIO window.
pub const IOAPIC_MMIO_LEN: u64 = 0x1000;
/// The bus window of the IOAPIC.
pub const IOAPIC_WINDOWS: [DeviceWindow; 1] =
    [DeviceWindow::new("ioapic", IOAPIC_BASE, IOAPIC_MMIO_LEN, 0)];
/// Value of the version register: version 0x11, 24 redirection entries.
pub const IOAPIC_VERSION: u32 = ((IOAPIC_PINS - 1) << 16) | 0x11;

const DEVICE: &str = "ioapic";

const IOREGSEL_OFFSET: u64 = 0x00;
const IOWIN_OFFSET: u64 = 0x10;
const REG_ID: u8 = 0x00;
const REG_VERSION: u8 = 0x01;
const REG_ARBITRATION: u8 = 0x02;
const REG_REDIRECTION_FIRST: u8 = 0x10;

const ENTRY_VECTOR: u64 = 0xff;
const ENTRY_DELIVERY_MODE_SHIFT: u32 = 8;
const ENTRY_LOGICAL: u64 = 1 << 11;
const ENTRY_REMOTE_IRR: u64 = 1 << 14;
const ENTRY_LEVEL: u64 = 1 << 15;
const ENTRY_MASKED: u64 = 1 << 16;
const ENTRY_DESTINATION_SHIFT: u32 = 56;
/// Bits the guest can write: everything but delivery status (12) and remote IRR (14).
const ENTRY_WRITABLE: u64 = 0xff00_0000_0001_afff;
/// Messages that may wait for the owner before new ones are dropped. Each pin queues at
/// most a few between two drains, so hitting the limit means the owner never drains it.
const MESSAGE_QUEUE_LIMIT: usize = 256;

/// Errors raised by [`Ioapic::set_irq`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IoapicError {
    #[error("IOAPIC pin {pin} is out of range: the IOAPIC has pins 0 to 23")]
    InvalidPin { pin: u32 },
}

/// Counters of the IOAPIC, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoapicStats {
    /// Interrupt messages sent towards the LAPIC.
    pub messages: u64,
    /// Messages dropped because the queue was full.
    pub dropped_messages: u64,
    /// Guest accesses ignored for a wrong size, an unused offset or an unknown register.
    pub ignored_accesses: u64,
}

/// The IOAPIC.
pub struct Ioapic {
    id: u32,
    select: u8,
    redirection: [u64; IOAPIC_PINS as usize],
    /// Asserted pins, one bit per pin.
    levels: u32,
    messages: Vec<InterruptMessage>,
    sent: u64,
    dropped_messages: GuestErrorLog,
    ignored_accesses: GuestErrorLog,
}

impl Default for Ioapic {
    fn default() -> Self {
        Self::new()
    }
}

impl Ioapic {
    /// Creates an IOAPIC with ID 0 and every pin masked, as after reset.
    pub fn new() -> Self {
        Ioapic {
            id: 0,
            select: 0,
            redirection: [ENTRY_MASKED; IOAPIC_PINS as usize],
            levels: 0,
            messages: Vec::new(),
            sent: 0,
            dropped_messages: GuestErrorLog::default(),
            ignored_accesses: GuestErrorLog::default(),
        }
    }

    /// Sets the level of input `pin`, queueing a message if the pin fires.
    pub fn set_irq(&mut self, pin: u32, level: bool) -> Result<(), IoapicError> {
        if pin >= IOAPIC_PINS {
            return Err(IoapicError::InvalidPin { pin });
        }
        let bit = 1 << pin;
        let was_asserted = self.levels & bit != 0;
        if level {
            self.levels |= bit;
        } else {
            self.levels &= !bit;
        }

        let index = pin as usize;
        let entry = self.redirection[index];
        if entry & ENTRY_LEVEL != 0 {
            self.service_level_pin(index);
        } else if level && !was_asserted && entry & ENTRY_MASKED == 0 {
            self.send(index);
        }
        Ok(())
    }

    /// Handles the LAPIC's EOI broadcast for `vector`: clears remote IRR of the
    /// level-triggered pins with that vector and fires those still asserted again.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        for index in 0..self.redirection.len() {
            let entry = self.redirection[index];
            if entry & ENTRY_LEVEL != 0
                && entry & ENTRY_REMOTE_IRR != 0
                && (entry & ENTRY_VECTOR) as u8 == vector
            {
                self.redirection[index] &= !ENTRY_REMOTE_IRR;
                self.service_level_pin(index);
            }
        }
    }

    /// Takes the messages queued for the LAPIC, oldest first.
    pub fn take_messages(&mut self) -> Vec<InterruptMessage> {
        std::mem::take(&mut self.messages)
    }

    /// Returns the vector that `pin` sends, or `None` if the pin is masked or out of range.
    pub fn unmasked_vector(&self, pin: u32) -> Option<u8> {
        let entry = *self.redirection.get(usize::try_from(pin).ok()?)?;
        (entry & ENTRY_MASKED == 0).then_some((entry & ENTRY_VECTOR) as u8)
    }

    /// Returns the IOAPIC's counters.
    pub fn stats(&self) -> IoapicStats {
        IoapicStats {
            messages: self.sent,
            dropped_messages: self.dropped_messages.count(),
            ignored_accesses: self.ignored_accesses.count(),
        }
    }

    /// Sends the message of a level-triggered pin if it is asserted, unmasked and not
    /// waiting for an EOI.
    fn service_level_pin(&mut self, index: usize) {
        let entry = self.redirection[index];
        let asserted = self.levels & (1 << index) != 0;
        if asserted && entry & (ENTRY_MASKED | ENTRY_REMOTE_IRR) == 0 {
            self.redirection[index] |= ENTRY_REMOTE_IRR;
            self.send(index);
        }
    }

    fn send(&mut self, index: usize) {
        let entry = self.redirection[index];
        if self.messages.len() >= MESSAGE_QUEUE_LIMIT {
            self.dropped_messages.record(
                DEVICE,
                format_args!("dropped message of pin {index}: {MESSAGE_QUEUE_LIMIT} messages wait undelivered"),
            );
            return;
        }
        self.sent += 1;
        self.messages.push(InterruptMessage {
            vector: (entry & ENTRY_VECTOR) as u8,
            delivery_mode: DeliveryMode::from_bits((entry >> ENTRY_DELIVERY_MODE_SHIFT) as u32),
            logical_destination: entry & ENTRY_LOGICAL != 0,
            destination: (entry >> ENTRY_DESTINATION_SHIFT) as u8,
            level_triggered: entry & ENTRY_LEVEL != 0,
        });
    }

    /// Returns the pin and the half (false for bits 31:0) of a redirection register.
    fn redirection_index(register: u8) -> Option<(usize, bool)> {
        let offset = register.checked_sub(REG_REDIRECTION_FIRST)?;
        let index = usize::from(offset / 2);
        (index < IOAPIC_PINS as usize).then_some((index, offset % 2 == 1))
    }

    fn read_register(&mut self) -> u32 {
        match self.select {
            REG_ID | REG_ARBITRATION => self.id,
            REG_VERSION => IOAPIC_VERSION,
            register => match Self::redirection_index(register) {
                Some((index, high)) => {
                    let entry = self.redirection[index];
                    if high {
                        (entry >> 32) as u32
                    } else {
                        entry as u32
                    }
                }
                None => {
                    self.ignored_accesses.record(
                        DEVICE,
                        format_args!("read of unknown IOAPIC register {register:#04x}"),
                    );
                    0
                }
            },
        }
    }

    fn write_register(&mut self, value: u32) {
        match self.select {
            REG_ID => self.id = value & 0x0f00_0000,
            register => match Self::redirection_index(register) {
                Some((index, high)) => self.write_redirection(index, high, value),
                None => self.ignored_accesses.record(
                    DEVICE,
                    format_args!(
                        "ignored write of {value:#x} to read-only or unknown IOAPIC register {register:#04x}"
                    ),
                ),
            },
        }
    }

    fn write_redirection(&mut self, index: usize, high: bool, value: u32) {
        let old = self.redirection[index];
        let written = if high {
            (old & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (old & !0xffff_ffff) | u64::from(value)
        };
        let mut entry = (written & ENTRY_WRITABLE) | (old & ENTRY_REMOTE_IRR);
        // An edge-triggered pin has no remote IRR. Linux switches a pin to edge and back to
        // clear a remote IRR that it believes stuck.
        if entry & ENTRY_LEVEL == 0 {
            entry &= !ENTRY_REMOTE_IRR;
        }
        self.redirection[index] = entry;

        // Unmasking a level-triggered pin that is asserted fires it.
        if entry & ENTRY_LEVEL != 0 {
            self.service_level_pin(index);
        }
    }
}

impl BusDevice for Ioapic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (IOREGSEL_OFFSET, 4) => u32::from(self.select),
            (IOWIN_OFFSET, 4) => self.read_register(),
            _ => {
                self.ignored_accesses.record(
                    DEVICE,
                    format_args!(
                        "ignored {}-byte read at offset {offset:#x}: only 4-byte accesses to IOREGSEL (0x00) and IOWIN (0x10) are valid",
                        data.len()
                    ),
                );
                fill_unclaimed(data);
                return;
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let value = match <[u8; 4]>::try_from(data) {
            Ok(bytes) => u32::from_le_bytes(bytes),
            Err(_) => u32::MAX,
        };
        match (offset, data.len()) {
            (IOREGSEL_OFFSET, 4) => self.select = value as u8,
            (IOWIN_OFFSET, 4) => self.write_register(value),
            _ => self.ignored_accesses.record(
                DEVICE,
                format_args!(
                    "ignored {}-byte write at offset {offset:#x}: only 4-byte accesses to IOREGSEL (0x00) and IOWIN (0x10) are valid",
                    data.len()
                ),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_register(ioapic: &mut Ioapic, register: u8, value: u32) {
        ioapic.write(IOREGSEL_OFFSET, &u32::from(register).to_le_bytes());
        ioapic.write(IOWIN_OFFSET, &value.to_le_bytes());
    }

    fn read_register(ioapic: &mut Ioapic, register: u8) -> u32 {
        ioapic.write(IOREGSEL_OFFSET, &u32::from(register).to_le_bytes());
        let mut data = [0u8; 4];
        ioapic.read(IOWIN_OFFSET, &mut data);
        u32::from_le_bytes(data)
    }

    fn program(ioapic: &mut Ioapic, pin: u8, entry: u64) {
        let register = REG_REDIRECTION_FIRST + 2 * pin;
        write_register(ioapic, register + 1, (entry >> 32) as u32);
        write_register(ioapic, register, entry as u32);
    }

    fn message(vector: u8, level_triggered: bool) -> InterruptMessage {
        InterruptMessage {
            vector,
            delivery_mode: DeliveryMode::Fixed,
            logical_destination: false,
            destination: 0,
            level_triggered,
        }
    }

    #[test]
    fn identification_registers() {
        let mut ioapic = Ioapic::new();
        write_register(&mut ioapic, REG_ID, 0xffff_ffff);

        assert_eq!(read_register(&mut ioapic, REG_ID), 0x0f00_0000);
        assert_eq!(read_register(&mut ioapic, REG_ARBITRATION), 0x0f00_0000);
        assert_eq!(read_register(&mut ioapic, REG_VERSION), 0x0017_0011);
        let mut select = [0u8; 4];
        ioapic.read(IOREGSEL_OFFSET, &mut select);
        assert_eq!(select, [REG_VERSION, 0, 0, 0]);
    }

    #[test]
    fn pins_start_masked() {
        let mut ioapic = Ioapic::new();

        ioapic.set_irq(4, true).unwrap();

        assert!(ioapic.take_messages().is_empty());
        assert_eq!(read_register(&mut ioapic, 0x18), ENTRY_MASKED as u32);
    }

    #[test]
    fn edge_pin_fires_on_rising_edge() {
        let mut ioapic = Ioapic::new();
        program(&mut ioapic, 4, 0x24);

        ioapic.set_irq(4, true).unwrap();
        ioapic.set_irq(4, true).unwrap();
        ioapic.set_irq(4, false).unwrap();

        assert_eq!(ioapic.take_messages(), vec![message(0x24, false)]);
        ioapic.set_irq(4, true).unwrap();
        assert_eq!(ioapic.take_messages(), vec![message(0x24, false)]);
    }

    #[test]
    fn entry_fields_reach_message() {
        let mut ioapic = Ioapic::new();
        // Vector 0x31, lowest priority, logical destination 0x05.
        program(&mut ioapic, 9, 0x0500_0000_0000_0931);

        ioapic.set_irq(9, true).unwrap();

        assert_eq!(
            ioapic.take_messages(),
            vec![InterruptMessage {
                vector: 0x31,
                delivery_mode: DeliveryMode::LowestPriority,
                logical_destination: true,
                destination: 0x05,
                level_triggered: false,
            }]
        );
    }

    #[test]
    fn level_pin_waits_for_eoi() {
        let mut ioapic = Ioapic::new();
        program(&mut ioapic, 16, ENTRY_LEVEL | 0x50);

        ioapic.set_irq(16, true).unwrap();
        assert_eq!(ioapic.take_messages(), vec![message(0x50, true)]);
        assert_ne!(
            read_register(&mut ioapic, 0x30) & ENTRY_REMOTE_IRR as u32,
            0
        );
        ioapic.set_irq(16, true).unwrap();
        assert!(ioapic.take_messages().is_empty(), "remote IRR blocks");

        ioapic.end_of_interrupt(0x50);
        assert_eq!(
            ioapic.take_messages(),
            vec![message(0x50, true)],
            "still asserted"
        );
        ioapic.set_irq(16, false).unwrap();
        ioapic.end_of_interrupt(0x50);

        assert!(ioapic.take_messages().is_empty());
        assert_eq!(
            read_register(&mut ioapic, 0x30) & ENTRY_REMOTE_IRR as u32,
            0
        );
    }

    #[test]
    fn eoi_for_other_vector_is_ignored() {
        let mut ioapic = Ioapic::new();
        program(&mut ioapic, 17, ENTRY_LEVEL | 0x51);
        ioapic.set_irq(17, true).unwrap();
        ioapic.take_messages();

        ioapic.end_of_interrupt(0x52);

        assert!(ioapic.take_messages().is_empty());
    }

    #[test]
    fn unmasking_asserted_level_pin_fires() {
        let mut ioapic = Ioapic::new();
        program(&mut ioapic, 10, ENTRY_MASKED | ENTRY_LEVEL | 0x60);
        ioapic.set_irq(10, true).unwrap();
        assert!(ioapic.take_messages().is_empty());

        program(&mut ioapic, 10, ENTRY_LEVEL | 0x60);

        assert_eq!(ioapic.take_messages(), vec![message(0x60, true)]);
    }

    #[test]
    fn switching_to_edge_clears_remote_irr() {
        let mut ioapic = Ioapic::new();
        program(&mut ioapic, 11, ENTRY_LEVEL | 0x61);
        ioapic.set_irq(11, true).unwrap();
        ioapic.set_irq(11, false).unwrap();
        ioapic.take_messages();

        program(&mut ioapic, 11, 0x61);
        program(&mut ioapic, 11, ENTRY_LEVEL | 0x61);

        assert_eq!(
            read_register(&mut ioapic, 0x26) & ENTRY_REMOTE_IRR as u32,
            0
        );
    }

    #[test]
    fn read_only_bits_are_kept() {
        let mut ioapic = Ioapic::new();

        write_register(&mut ioapic, 0x12, 0xffff_ffff);
        write_register(&mut ioapic, 0x13, 0xffff_ffff);

        assert_eq!(
            read_register(&mut ioapic, 0x12),
            (ENTRY_WRITABLE & 0xffff_ffff) as u32
        );
        assert_eq!(read_register(&mut ioapic, 0x13), 0xff00_0000);
    }

    #[test]
    fn unmasked_vector_of_pin() {
        let mut ioapic = Ioapic::new();
        program(&mut ioapic, 2, 0x30);

        assert_eq!(ioapic.unmasked_vector(2), Some(0x30));
        assert_eq!(ioapic.unmasked_vector(3), None, "masked at reset");
        assert_eq!(ioapic.unmasked_vector(IOAPIC_PINS), None);
        assert_eq!(ioapic.unmasked_vector(u32::MAX), None);
    }

    #[test]
    fn invalid_pins_are_rejected() {
        let mut ioapic = Ioapic::new();

        assert_eq!(
            ioapic.set_irq(24, true),
            Err(IoapicError::InvalidPin { pin: 24 })
        );
        assert_eq!(
            ioapic.set_irq(u32::MAX, true),
            Err(IoapicError::InvalidPin { pin: u32::MAX })
        );
    }

    #[test]
    fn message_queue_is_bounded() {
        let mut ioapic = Ioapic::new();
        program(&mut ioapic, 1, 0x21);

        for _ in 0..MESSAGE_QUEUE_LIMIT + 5 {
            ioapic.set_irq(1, true).unwrap();
            ioapic.set_irq(1, false).unwrap();
        }

        assert_eq!(ioapic.take_messages().len(), MESSAGE_QUEUE_LIMIT);
        assert_eq!(ioapic.stats().dropped_messages, 5);
    }

    #[test]
    fn malformed_accesses_are_ignored() {
        let mut ioapic = Ioapic::new();
        program(&mut ioapic, 0, 0x20);

        let mut byte = [0u8; 1];
        ioapic.read(IOWIN_OFFSET, &mut byte);
        assert_eq!(byte, [0xff]);
        let mut word = [0u8; 4];
        ioapic.read(0x40, &mut word);
        assert_eq!(word, [0xff; 4]);
        ioapic.write(IOWIN_OFFSET, &[0xff]);
        ioapic.write(u64::MAX, &[0; 4]);
        assert_eq!(read_register(&mut ioapic, 0x40), 0);
        assert_eq!(read_register(&mut ioapic, 0x03), 0);
        write_register(&mut ioapic, REG_VERSION, 0);
        write_register(&mut ioapic, 0xff, 0);

        assert_eq!(read_register(&mut ioapic, 0x10), 0x20);
        assert_eq!(read_register(&mut ioapic, REG_VERSION), IOAPIC_VERSION);
        assert_eq!(ioapic.stats().ignored_accesses, 8);
    }
}
